"""Captions without sidecars: with ``captions.require`` and no captioner model, `k5 curate` on a folder of real
photos without caption files stops before scoring with one line naming the config keys; a captioned folder runs;
a partly captioned one runs with that line as a warning; ``--captioner PATH`` (a tiny random Qwen2.5-VL built
through ``from_pretrained``) captions the photos."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_curation_models import tiny_vlm  # noqa: F401  (module-scoped fixture: the tiny Qwen2.5-VL folder)

from k5cli.curate import curate
from k5data.curation.captions import MissingCaptioner
from k5data.curation.catalog import Catalog
from k5data.curation.config import load_config
from k5data.curation.corpus import CAPTIONS, skimage_dir
from k5data.curation.curate import run_curation
from k5data.curation.output import read_dataset

PHOTOS = ["astronaut.png", "coffee.png"]


def _photos(folder: Path, captioned: tuple[str, ...] = ()) -> Path:
    folder.mkdir()
    for name in PHOTOS:
        shutil.copyfile(skimage_dir() / name, folder / name)
        stem = Path(name).stem
        if stem in captioned:
            (folder / f"{stem}.txt").write_text(CAPTIONS[stem] + "\n")
    return folder


def test_captioned_folder_runs(tmp_path: Path) -> None:
    src = _photos(tmp_path / "src", captioned=("astronaut", "coffee"))
    result = CliRunner().invoke(curate, [str(src), str(tmp_path / "out"), "--no-progress"])
    assert result.exit_code == 0, result.output
    df = read_dataset(str(tmp_path / "out"), load_config())
    assert len(df) == 2 and df["caption_backend"].eq("sidecar").all() and df["passed"].all()


def test_photos_without_sidecars_stop_up_front_with_one_line(tmp_path: Path) -> None:
    src, out = _photos(tmp_path / "src"), tmp_path / "out"
    result = CliRunner().invoke(curate, [str(src), str(out), "--no-progress"])
    assert result.exit_code == 1
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: 2 of 2 media files"), result.output
    for key in ["captions.backend: qwen2_5_vl", "captions.model_path", "--captioner PATH", "captions.require"]:
        assert key in lines[0]
    catalog = Catalog(out / "catalog.duckdb")
    assert len(catalog.unscored()) == 2 and not catalog.items()  # registered, nothing scored: a re-run picks up
    with pytest.raises(MissingCaptioner):  # the library says the same to the Dagster assets
        run_curation(str(src), str(tmp_path / "out2"), progress=False)
    # require: false is the documented way to keep uncaptioned rows
    cfg = load_config(overrides={"captions": {"require": False}})
    assert run_curation(str(src), str(tmp_path / "out3"), cfg, progress=False).dataset["rows"] == 2


def test_partly_captioned_folder_warns_and_runs(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    src = _photos(tmp_path / "src", captioned=("astronaut",))
    with caplog.at_level(logging.WARNING, logger="k5data.curation.curate"):
        summary = run_curation(str(src), str(tmp_path / "out"), progress=False)
    assert summary.dataset["rows"] == 2 and summary.dataset["reject_reasons"].get("no_caption") == 1
    (record,) = [r for r in caplog.records if "no caption sidecar" in r.getMessage()]
    assert record.getMessage().startswith("1 of 2 media files") and "captions.model_path" in record.getMessage()


def test_captioner_option_captions_photos_without_sidecars(tmp_path: Path, tiny_vlm: Path) -> None:  # noqa: F811
    src = _photos(tmp_path / "src")
    config = tmp_path / "short.yaml"
    config.write_text("captions:\n  max_new_tokens: 4\n")  # the tiny random model: a few tokens are enough
    result = CliRunner().invoke(curate, [str(src), str(tmp_path / "out"), "--no-progress", "--config", str(config),
                                         "--captioner", str(tiny_vlm)])
    assert result.exit_code == 0, result.output
    df = read_dataset(str(tmp_path / "out"), load_config())
    assert len(df) == 2 and df["caption_backend"].eq("qwen2_5_vl").all()
    bad = CliRunner().invoke(curate, [str(src), str(tmp_path / "out"), "--captioner", str(tmp_path / "nope")])
    assert bad.exit_code == 2 and "--captioner" in bad.output  # a missing folder is refused by the option itself
