"""Progress in a log file is a line per interval, never a stream of carriage returns."""

from cpfean.progress import progress


def test_lines_when_not_a_terminal(capsys):
    seen = list(progress(range(5), desc="encode", unit="img", interval=0.0))
    assert seen == [0, 1, 2, 3, 4]
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert "\r" not in err and len(lines) == 6  # one per item at interval 0, one at the end
    assert lines[0].startswith("encode: 1/5 img") and lines[-1].startswith("encode: 5/5 img")


def test_driven_by_update_and_quiet_when_disabled(capsys):
    with progress(total=3, desc="extract", unit="img", interval=3600) as bar:
        bar.update(2)
        bar.set_postfix(loss="0.5")
        bar.update(1)
    closing = capsys.readouterr().err.splitlines()
    assert len(closing) == 1 and closing[0].startswith("extract: 3/3 img")
    assert "loss=0.5" in closing[0]
    with progress(total=3, desc="extract", interval=3600) as bar:
        bar.update(3)
    out = capsys.readouterr().err.splitlines()
    assert len(out) == 1 and out[0].startswith("extract: 3/3 it")  # only the closing line
    for _ in progress(range(4), desc="quiet", enabled=False, interval=0.0):
        pass
    assert capsys.readouterr().err == ""
