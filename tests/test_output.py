"""What a command prints: by default no Lightning tips, no model summary, no known internal
warnings; the run folder and the final summary are there. ``--verbose`` brings the rest back."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from _helpers import ONE_THREAD_ENV, cli_output, tiny_fit_args
from conftest import DARK_BRIGHT, write_synthetic_folder

NOISE = {
    "tip": "💡 Tip",
    "litlogger": "litlogger",
    "gpu banner": "GPU available:",
    "model summary": "Trainable params",
    "pytree deprecation": "isinstance(treespec, LeafSpec)",
    "log dir warning": "Experiment logs directory",
}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_synthetic_folder(tmp_path_factory.mktemp("img") / "data", (12, 12), 40, **DARK_BRIGHT)


def _fit(tmp_path, data, *extra: str) -> str:
    run = tmp_path / "run"
    return cli_output(*tiny_fit_args(data, run, tmp_path / "cache"), *extra)


def test_default_fit_prints_no_lightning_chatter(tmp_path, data):
    text = _fit(tmp_path, data)
    shown = {name for name, line in NOISE.items() if line in text}
    assert not shown, text[:3000]
    # what helps stays: where the run went and the selection summary
    assert f"run folder: {tmp_path / 'run'}" in text
    assert '"best_checkpoint"' in text


def test_verbose_fit_shows_it_again(tmp_path, data):
    text = _fit(tmp_path, data, "--verbose")
    missing = {name for name, line in NOISE.items() if line not in text and name != "pytree deprecation"}
    # the pytree FutureWarning exists only with torch versions that deprecate LeafSpec
    assert not missing, text[:3000]
    assert f"run folder: {tmp_path / 'run'}" in text


def test_quiet_can_be_undone_in_process():
    import logging
    import warnings

    from diffmic.training import console

    console.quiet(True)
    assert logging.getLogger("lightning.pytorch").level == logging.WARNING
    assert not console.model_summary(for_fit=True)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        console.quiet(True)  # re-applied inside the recording context
        warnings.warn("The number of training batches (2) is smaller than the logging interval x", UserWarning)
        warnings.warn("some other warning", UserWarning)
    assert [str(w.message) for w in seen] == ["some other warning"]
    console.quiet(False)
    assert logging.getLogger("lightning.pytorch").level == logging.INFO
    assert console.model_summary(for_fit=True) and not console.model_summary(for_fit=False)


@pytest.mark.parametrize(
    "argv", [["-v", "fit"], ["fit", "-v"], ["fit", "--verbose"], ["test", "--run", "r", "-v"], ["data", "check", "-v"]]
)
def test_verbose_switch_anywhere(argv):
    from diffmic.cli import _parser

    args, _ = _parser().parse_known_args(argv)
    assert args.verbose is True
    args, _ = _parser().parse_known_args([a for a in argv if a not in ("-v", "--verbose")])
    assert args.verbose is False


def test_a_relative_run_folder_trains_tests_and_writes_only_inside_it(tmp_path, data):
    """`make demo` and the README write into relative folders (runs/demo): every atomic write there
    (the output manifest, checkpoints, the data cache, the test outputs) must accept them. The demo's
    sequence: fit, test, then fit --overwrite (what a second `make demo` does)."""
    work = tmp_path / "cwd"
    work.mkdir()
    fit = tiny_fit_args(data, Path("runs/rel"), Path("cache"))

    def cli(*args: str) -> None:
        out = subprocess.run(
            [sys.executable, "-m", "diffmic.cli", *args],
            capture_output=True,
            text=True,
            timeout=600,
            env=ONE_THREAD_ENV,
            cwd=work,
            check=False,
        )
        assert out.returncode == 0, (args[0], out.stderr[-3000:])

    cli(*fit)
    cli("test", "--run", "runs/rel")
    run = work / "runs/rel"
    assert (run / "checkpoints").is_dir() and (run / "fit_summary.json").is_file()
    assert (run / "test_metrics.json").is_file()
    mine = run / "notes.txt"  # a file diffmic did not write survives --overwrite
    mine.write_text("keep")
    cli(fit[0], "--overwrite", *fit[1:])
    assert mine.read_text() == "keep" and not (run / "test_metrics.json").exists()
    assert sorted(p.name for p in work.iterdir()) == ["cache", "runs"]
    assert not [p for p in run.rglob("*.tmp*")]
