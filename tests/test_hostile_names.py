"""Issue 21, second hostile round (items 2, 4, 6, 8, 9): names are data, never markup; the report
writes only under the run (or ``--output``) folder and never over a file diffmic did not write;
the cost of one image is bounded before anything is decoded.

Two tiny runs (a few seconds each) with hostile names everywhere a name can come from: class
folder names and file names (a folder data set), CSV class names and absolute CSV paths (a CSV
data set), and hostile strings in ``test_metrics.json``.
"""

from __future__ import annotations

import csv
import hashlib
import json
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffmic.cli import main
from diffmic.data.records import DataError

from _helpers import TINY_MODEL, one_thread  # noqa: F401
from conftest import DISCS, synthetic_images

# a name that would run script in a browser, and one that matplotlib's mathtext cannot parse
FOLDER_CLASSES = ["<img src=x onerror=alert(1)> $\\undefinedcmd$", "$\\undefinedcmd$", "a&b \"q\" 'x' ]]> <!-- $x^{$"]
CSV_CLASSES = ["</script><script>alert(2)</script>", "<img src=y onerror=alert(3)>", "$\\undefinedcmd$"]
FILE_STEMS = ["<svg onload=alert(4)>", "x' onmouseover='alert(5)", "$\\frac{a$", "plain"]
SAMPLER = "<script>alert(6)</script>"
CALIBRATOR = "<img src=z onerror=alert(7)>"
OUR_TAGS = {
    "html",
    "head",
    "meta",
    "title",
    "style",
    "body",
    "h1",
    "h2",
    "h3",
    "p",
    "div",
    "table",
    "tr",
    "th",
    "td",
    "img",
    "figure",
    "figcaption",
}


def _images(folder: Path, n: int, c: int, seed: int, stems) -> list[Path]:
    """``n`` images of class ``c`` of conftest's coloured discs (40x48), under hostile file names."""
    imgs, _ = synthetic_images([n if k == c else 0 for k in range(3)], (40, 48), seed, rgb=True, **DISCS)
    out = []
    for i, img in enumerate(imgs):
        p = folder / f"{stems[i % len(stems)]} {i:02d}.png"
        if i % 5 == 4:  # an input named like a gallery file the old report wrote next to its input
            p = folder / f"{stems[i % len(stems)]} {i - 1:02d}.png.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img).save(p)
        out.append(p)
    return out


def _fit(root_override: list[str], tmp: Path) -> Path:
    run = tmp / "run"
    rc = main(
        [
            "fit",
            "--config",
            "cpu_v1",
            "data.image_size=32",
            "data.batch_size=16",
            *TINY_MODEL,
            *root_override,
            "data.split=random",
            "data.test_fraction=0.3",
            "data.val_fraction=0.3",
            f"data.cache_dir={tmp / 'cache'}",
            f"run.dir={run}",
            "train.epochs=1",
            "train.dcg_warmup_epochs=1",
            "eval.num_samples=4",
            "eval.bootstrap_resamples=20",
        ]
    )
    assert rc == 0
    assert main(["test", "--run", str(run)]) == 0
    # hostile strings where the report reads values from test_metrics.json
    tm = json.loads((run / "test_metrics.json").read_text())
    tm["sampler"] = SAMPLER
    tm["variant"] = "<b onclick=alert(8)>full</b>"
    tm["calibration"]["calibrator"] = CALIBRATOR
    tm["calibration"]["fitted_on"] = "<iframe src=javascript:alert(9)>"
    tm.setdefault("referral", {})["rule"] = "</p><script>alert(10)</script>"
    tm.setdefault("uncertainty", {})["method"] = "<svg/onload=alert(11)>"
    tm["ci_method"] = "' onfocus='alert(12)"
    (run / "test_metrics.json").write_text(json.dumps(tm))
    return run


def _tree(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture(scope="module")
def folder_run(tmp_path_factory, one_thread) -> tuple[Path, Path]:  # noqa: F811
    """Class folders with hostile names, hostile file names."""
    tmp = tmp_path_factory.mktemp("hostile_folder")
    root = tmp / "imgs"
    for c, name in enumerate(FOLDER_CLASSES):
        _images(root / name, 14, c, c, FILE_STEMS)
    return _fit(["data.dataset=folder", f"data.root={root}"], tmp), root


@pytest.fixture(scope="module")
def csv_run(tmp_path_factory, one_thread) -> tuple[Path, Path]:  # noqa: F811
    """Hostile class names in a CSV whose paths are absolute (the images live in the user's folder)."""
    tmp = tmp_path_factory.mktemp("hostile_csv")
    root = tmp / "<img src=w onerror=alert(13)>"  # the user's image folder
    rows = []
    for c, name in enumerate(CSV_CLASSES):
        for p in _images(root / "all", 14, c, 10 + c, [f"{s} {len(rows)}" for s in FILE_STEMS]):
            rows.append({"path": str(p.resolve()), "label": name})
    manifest = tmp / "manifest.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["path", "label"])
        w.writeheader()
        w.writerows(rows)
    return _fit(["data.dataset=csv", f"data.root={manifest}"], tmp), root


class _Parsed(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: list[tuple[str, dict]] = []
        self.text: list[str] = []
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_startendtag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))

    def handle_data(self, data):
        self.text.append(data)

    def handle_comment(self, data):
        self.tags.append(("<!--", {"data": data}))


def _check_html(html: str, names: list[str], ids: list[str]) -> _Parsed:
    parsed = _Parsed()
    parsed.feed(html)
    parsed.close()
    tags = [t for t, _ in parsed.tags]
    assert set(tags) <= OUR_TAGS, sorted(set(tags) - OUR_TAGS)  # no <script>, <svg>, <iframe>, comment
    for tag, attrs in parsed.tags:
        assert not [a for a in attrs if a.lower().startswith("on")], (tag, attrs)  # no event handler
        assert set(attrs) <= {"alt", "src", "class", "id", "style", "charset", "name", "content"}, (tag, attrs)
        if tag == "img":
            assert attrs["src"].startswith("data:image/png;base64,"), attrs["src"][:80]
    text = "".join(parsed.text)
    alts = [a.get("alt", "") for t, a in parsed.tags if t == "img"]
    for n in names:  # shown verbatim, as text
        assert n in text, n
    for s in (SAMPLER, CALIBRATOR, "<iframe src=javascript:alert(9)>", "</p><script>alert(10)</script>"):
        assert s in text, s
    gallery_ids = [i for i in ids if any(i == a for a in alts)]
    assert gallery_ids, "no gallery image carries its id as alt text"
    for i in gallery_ids:
        assert i in text  # the caption shows the id verbatim
    return parsed


def _ids(run: Path) -> list[str]:
    with open(run / "predictions.csv", newline="") as fh:
        return [r["id"] for r in csv.DictReader(fh)]


@pytest.mark.parametrize("which", ["folder", "csv"])
def test_report_shows_hostile_names_as_text_and_writes_only_under_the_run(which, folder_run, csv_run, tmp_path):
    """Items 2, 6, 9: class names (folder and CSV), file names and test_metrics.json values reach
    the HTML escaped and the figures as plain text; the gallery never writes next to the inputs."""
    pytest.importorskip("sklearn")
    run, images = folder_run if which == "folder" else csv_run
    names = FOLDER_CLASSES if which == "folder" else CSV_CLASSES
    before = _tree(images)
    out = tmp_path / "out" / "report.html"
    assert main(["report", str(run), "--output", str(out), "--max-images", "30", "--gallery", "3"]) == 0
    html = out.read_text(encoding="utf-8")
    _check_html(html, names, _ids(run))
    assert _tree(images) == before  # no input overwritten, nothing new beside the inputs
    gallery = sorted((run / "report_files").rglob("*.png"))
    assert gallery
    # every gallery file under the run folder, one per figure, names that cannot collide
    n_figures = html.count("<figure>")
    assert n_figures >= 1
    assert len({p.name.lower() for p in gallery}) == len(gallery)
    for p in gallery:
        assert p.resolve().is_relative_to(run.resolve())
        assert p.name.isascii() and "<" not in p.name and "$" not in p.name


def _sizes_and_hashes(*paths: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest() for p in paths]


def test_report_output_never_overwrites_a_file_diffmic_did_not_write(folder_run, tmp_path, capsys):
    """Item 4: an input image, a checkpoint, a user's notes, a folder: refused (exit 2, named),
    untouched; the default RUN/report.html likewise when it is the user's file."""
    run, images = folder_run
    img = next(p for p in sorted(images.rglob("*.png")))
    ckpt = run / "checkpoints" / "best.ckpt"
    notes = tmp_path / "notes.html"
    notes.write_text("<p>my notes</p>")
    keep = [img, ckpt, notes]
    before = _sizes_and_hashes(*keep)
    for target in (img, ckpt, notes, run / "config.yaml", run / "predictions.csv"):
        capsys.readouterr()
        assert main(["report", str(run), "--output", str(target)]) == 2, target
        err = capsys.readouterr().err
        assert err.startswith("diffmic report: error: ") and str(target) in err and "Traceback" not in err
    assert main(["report", str(run), "--output", str(tmp_path)]) == 2  # a folder
    assert _sizes_and_hashes(*keep) == before
    lesions = run / "lesion_hits.json"  # a file of the user's where the report writes its hit rates
    lesions.write_text("user data")
    try:
        assert main(["report", str(run), "--output", str(tmp_path / "r.html")]) == 2
        assert lesions.read_text() == "user data" and not (tmp_path / "r.html").exists()
    finally:
        lesions.unlink()
    user_report = run / "report.html"
    user_report.write_text("my own report.html, not diffmic's")
    try:
        assert main(["report", str(run)]) == 2
        assert user_report.read_text() == "my own report.html, not diffmic's"
    finally:
        user_report.unlink()


def test_report_replaces_its_own_earlier_report(folder_run, tmp_path):
    """Item 4, the other side: diffmic's own report (also one of an older diffmic) is replaced."""
    pytest.importorskip("sklearn")
    run, _ = folder_run
    out = tmp_path / "r.html"
    # the first lines of a report written before reports carried the generator marker
    out.write_text("<!DOCTYPE html><html><head><meta charset='utf-8'><title>diffmic report: old</title></head></html>")
    assert main(["report", str(run), "--output", str(out), "--max-images", "20", "--gallery", "1"]) == 0
    first = out.read_text()
    assert "diffmic report" in first and "old</title>" not in first
    assert main(["report", str(run), "--output", str(out), "--max-images", "20", "--gallery", "1"]) == 0


def test_report_gallery_refuses_a_foreign_file_in_its_place(folder_run, tmp_path):
    """Item 6: a file of the user's where a gallery PNG would go is never written over."""
    pytest.importorskip("sklearn")
    run, _ = folder_run
    out = tmp_path / "r.html"
    assert main(["report", str(run), "--output", str(out), "--max-images", "20", "--gallery", "1"]) == 0
    pngs = sorted((run / "report_files").rglob("*.png"))
    assert pngs
    victim = pngs[0]
    victim.write_bytes(b"user's file")
    try:
        assert main(["report", str(run), "--output", str(out), "--max-images", "20", "--gallery", "1"]) == 2
        assert victim.read_bytes() == b"user's file"
    finally:
        victim.unlink()


def test_predict_explain_with_a_mathtext_class_name(folder_run, tmp_path):
    """Item 9: a class called ``$\\undefinedcmd$`` is drawn as plain text (every class name here
    holds mathtext that does not parse, so whatever the prediction the title has one)."""
    run, images = folder_run
    out = tmp_path / "ex"
    picks = [sorted((images / n).glob("*.png"))[0] for n in FOLDER_CLASSES]
    args = ["predict", "--run", str(run), *map(str, picks), "--explain", str(out), "--output", str(tmp_path / "p.csv")]
    assert main(args) == 0
    assert len(list(out.rglob("*.png"))) == 3


def _thin_png(path: Path, w: int, h: int) -> Path:
    Image.new("L", (w, h), 128).save(path)
    return path


@pytest.mark.parametrize("size", [(2, 70000), (4, 20000), (4, 2000), (20000, 4)])
def test_predict_refuses_an_extreme_aspect_ratio_before_decoding(size, folder_run, tmp_path, capsys):
    """Item 8: a tiny thin PNG is refused by its header (exit 2, the file named), not drawn."""
    run, _ = folder_run
    p = _thin_png(tmp_path / "thin.png", *size)
    assert p.stat().st_size < 20_000
    capsys.readouterr()
    assert main(["predict", "--run", str(run), str(p), "--explain", str(tmp_path / "ex")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("diffmic predict: error: ") and str(p) in err and "aspect ratio" in err
    assert not (tmp_path / "ex").exists() or not list((tmp_path / "ex").rglob("*.png"))


# ---------------------------------------------------------------------------------------- no run


def test_open_image_refuses_extreme_aspect_ratio_from_the_header(tmp_path, monkeypatch):
    from diffmic.data.transforms import decode_image, open_image

    p = _thin_png(tmp_path / "thin.png", 2, 70000)
    loaded = []
    monkeypatch.setattr(Image.Image, "load", lambda self, *a, **k: loaded.append(1))
    with pytest.raises(DataError, match=r"thin\.png: 2x70000 .*aspect ratio"):
        open_image(p)
    with pytest.raises(DataError, match="aspect ratio"):
        decode_image(p.read_bytes(), 32)  # an upload (bytes)
    assert not loaded  # refused before any pixel was decoded
    monkeypatch.undo()
    with pytest.raises(DataError, match="aspect ratio"):
        decode_image(np.zeros((2, 100, 3), np.uint8), 32)  # an in-memory array too
    ok = _thin_png(tmp_path / "ok.png", 10, 200)  # 20:1 is accepted, one pixel more is not
    assert decode_image(ok, 32).shape == (32, 32, 3)
    with pytest.raises(DataError, match=r"10x201 .*more than the 20:1"):
        open_image(_thin_png(tmp_path / "over.png", 10, 201))


@pytest.mark.parametrize("hw", [(4000, 200), (2000, 4), (60, 1200), (40, 48)])
def test_explanation_figure_size_is_bounded_whatever_the_input(hw, tmp_path):
    """Item 8: the figure of an image of any shape has a bounded pixel count (the original is
    drawn at most MAX_PANEL_PX on its long side), and the overlays still land where they belong."""
    from diffmic.reporting.overlay import MAX_PANEL_PX, draw_explanation

    H, W = hw
    img = np.full((H, W, 3), 100, np.uint8)
    sal = np.random.default_rng(0).random((7, 7)).astype(np.float32)
    mask = np.zeros((H, W), bool)
    mask[H // 3 : H // 2, W // 3 : W // 2] = True
    out = draw_explanation(img, sal, [[2, 2, 10, 10]], [0.5], 32, "t", tmp_path / "e.png", mask=mask)
    w, h = Image.open(out).size
    assert w <= 2 * MAX_PANEL_PX + 20 and h <= MAX_PANEL_PX + 60, (w, h)
    assert w * h <= 2.2 * MAX_PANEL_PX * MAX_PANEL_PX
    if max(H, W) <= MAX_PANEL_PX and W >= 240:  # small enough: still one figure pixel per image pixel
        assert w >= 2 * W and h >= H


HOSTILE_TEXTS = ["$\\undefinedcmd$", "$x^{$", "\\$ \\\\ $$", "a_b^c %#&{}~", "$\\frac{1}{0}$ $"]


def _shown(text_artist) -> str:
    """What matplotlib draws for a Text: mathtext off, the escapes of ``$`` undone."""
    s, mode = text_artist._preprocess_math(text_artist.get_text())
    assert mode is False, text_artist.get_text()
    return s


def test_figure_texts_are_plain_text(tmp_path):
    """Item 9: titles, tick labels, legends and bar names holding data never go through mathtext."""
    import matplotlib.pyplot as plt
    import torch
    from matplotlib.text import Text

    from diffmic.inference.explain import _conformal_figure, _confusion
    from diffmic.reporting import plain_text, plot_risk_coverage
    from diffmic.reporting.overlay import draw_explanation

    for s in HOSTILE_TEXTS:
        assert _shown(Text(0, 0, plain_text(s))) == s
    names = HOSTILE_TEXTS[:3]
    draw_explanation(np.zeros((40, 48, 3), np.uint8), None, None, None, 32, HOSTILE_TEXTS[0], tmp_path / "e.png")
    plot_risk_coverage(torch.linspace(0, 1, 5), torch.linspace(1, 0.5, 5), tmp_path / "r.png", title=HOSTILE_TEXTS[1])
    fig = _confusion([[1, 2, 0], [0, 3, 1], [2, 0, 4]], names)
    fig.savefig(tmp_path / "c.png")
    shown = {_shown(t) for t in fig.findobj(Text) if t.get_text()}
    assert set(names) <= shown
    plt.close(fig)
    conf = {
        "level": 0.9,
        "coverage": 0.91,
        "mean_set_size": 1.3,
        "per_class": {n: {"coverage": 0.9, "mean_set_size": 1.2} for n in names},
    }
    fig = _conformal_figure(conf)
    fig.savefig(tmp_path / "f.png")
    fig.canvas.draw()
    shown = {_shown(t) for t in fig.findobj(Text) if t.get_text()}
    assert set(names) <= shown
    plt.close(fig)
