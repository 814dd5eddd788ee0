"""The sync benchmark's change to a photo folder, and its refusal of missing inputs."""

from __future__ import annotations

from pipelines.bench import sync


def test_change_adds_overwrites_and_deletes(tmp_path):
    photos, donors = tmp_path / "photos", tmp_path / "donors"
    photos.mkdir()
    donors.mkdir()
    for i in range(6):
        (photos / f"{i}.jpg").write_bytes(b"photo %d" % i)
        (donors / f"d{i}.jpg").write_bytes(b"donor %d" % i)
    sync._change(photos, sorted(donors.iterdir()), add=2, change=2, delete=1)
    names = sorted(p.relative_to(photos).as_posix() for p in photos.rglob("*") if p.is_file())
    assert names == [
        "0.jpg",
        "1.jpg",
        "2.jpg",
        "4.jpg",
        "5.jpg",
        "added/0000.jpg",
        "added/0001.jpg",
    ]
    assert (photos / "4.jpg").read_bytes() == b"donor 2" and (
        photos / "5.jpg"
    ).read_bytes() == b"donor 3"
    assert (photos / "added" / "0001.jpg").read_bytes() == b"donor 1"
    assert (photos / "0.jpg").read_bytes() == b"photo 0"


def test_missing_inputs_are_one_error_line(tmp_path, capsys):
    code = sync.main(["--checkpoint", str(tmp_path / "none.pt"), "--workdir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: not found") and err.count("\n") == 1
