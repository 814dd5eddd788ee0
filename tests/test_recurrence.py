import torch

from cpfean.recurrence import sibling_targets, sibling_token_ids

VOCAB = {w: i + 10 for i, w in enumerate("a the red ball blue box on grass near tree".split())}


def tokenize(texts):
    rows = [[VOCAB[w] for w in t.split()] for t in texts]
    T = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    att = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)] = torch.tensor(r)
        att[i, : len(r)] = 1
    return {"input_ids": ids, "attention_mask": att}


def test_recurring_content_words_are_prominent_and_shared_words_cancel():
    img0 = ["a red ball on grass", "the red ball near a tree", "a red ball"]
    img1 = ["a blue box", "the blue box on grass"]
    captions = [img0[0], img1[0]]
    sib = sibling_token_ids(tokenize, [img0, img1], captions)
    assert sib.shape == (2, 2, 6)  # img0 has two siblings; img1 one (padded)
    tok = tokenize(captions)
    mask = tok["attention_mask"].bool()
    t = sibling_targets(tok["input_ids"], mask, sib, torch.tensor([0, 1]))
    words0 = img0[0].split()
    target0 = dict(zip(words0, t[0, : len(words0)].tolist(), strict=True))
    # "red" and "ball" recur in both siblings and not in the other image's caption
    assert target0["red"] == 1.0 and target0["ball"] == 1.0
    # "a" recurs once of two siblings but the other image's caption has it too: 0.5 - 1
    assert target0["a"] == 0.0
    # "grass" and "on" appear in no sibling of image 0
    assert target0["grass"] == 0.0 and target0["on"] == 0.0
    words1 = img1[0].split()
    target1 = dict(zip(words1, t[1, : len(words1)].tolist(), strict=True))
    assert target1["blue"] == 1.0 and target1["box"] == 1.0 and target1["a"] == 0.0
    assert (t[~mask] == 0).all()


def test_no_siblings_gives_zero_targets():
    sib = sibling_token_ids(tokenize, [["a red ball"]], ["a red ball"])
    tok = tokenize(["a red ball"])
    t = sibling_targets(tok["input_ids"], tok["attention_mask"].bool(), sib, torch.tensor([0]))
    assert t.sum() == 0
