"""Luigi plumbing: atomic outputs, failure reporting, CLI registration."""
from pathlib import Path

import pytest

from michi.data.audio_corpus import merge_continuations
from michi.data.pipeline import atomic_path, build, luigi


class _Fails(luigi.Task):
    path = luigi.Parameter()

    def output(self):
        return luigi.LocalTarget(self.path)

    def run(self):
        with atomic_path(self.path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("boom")


def test_failed_task_fails_the_build_and_leaves_no_output(tmp_path, capsys):
    out = tmp_path / "x.txt"
    assert build([_Fails(path=str(out))], workers=1) is False
    assert not out.exists() and list(tmp_path.iterdir()) == []
    assert "FAILED" in capsys.readouterr().err


def test_atomic_path_renames_on_success(tmp_path):
    with atomic_path(tmp_path / "a" / "b.json") as tmp:
        assert tmp.parent == tmp_path / "a"
        tmp.write_text("{}")
    assert (tmp_path / "a" / "b.json").read_text() == "{}"
    assert [p.name for p in (tmp_path / "a").iterdir()] == ["b.json"]


def test_merge_whisper_continuations():
    words = [("non", 0.0, 0.3), ("-administrator", 0.3, 1.0), ("users.", 1.0, 1.4), ("it", 1.5, 1.6),
             ("'s", 1.6, 1.7)]
    assert merge_continuations(words) == [("non-administrator", 0.0, 1.0), ("users.", 1.0, 1.4),
                                          ("it's", 1.5, 1.7)]


def test_cli_registers_data_commands(capsys):
    from michi.cli import build_parser

    args = build_parser().parse_args(["data", "synth", "--out", "x", "--voices", "flite-slt,flite-kal16"])
    assert args.tts_voice == "piper-joe" and args.tts_sentences == 1500 and args.workers >= 1
    args = build_parser().parse_args(["data", "latents", "--corpus", "c", "--model", "tiny"])
    assert args.shard_size == 512
    with pytest.raises(SystemExit):
        build_parser().parse_args(["data", "audio", "--out", "x"])  # --in is required
    assert Path(args.corpus).name == "c"
