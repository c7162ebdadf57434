"""The command line: thin wrappers, real output, exit codes."""

from __future__ import annotations

import subprocess
import sys


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "clipcond", *args], capture_output=True, text=True, timeout=300)


def test_list():
    out = run("list")
    assert out.returncode == 0
    rows = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "sd15, sd1" in rows["clip-vit-l-14"] and " 2048 " in rows["sdxl"] and "zeros" in rows["sdxl"]


def test_encode_prints_shapes_norms_and_source():
    out = run("encode", "--encoder", "tiny-sdxl", "a photo of a cat", "a dog")
    assert out.returncode == 0, out.stderr
    assert "sequence (2, 77, 80) torch.float32 on cpu; pooled (2, 48)" in out.stdout
    assert "[0] 'a photo of a cat': 7 tokens" in out.stdout and "null (zeros)" in out.stdout


def test_encode_errors_exit_2_with_a_message():
    out = run("encode", "--encoder", "sd9", "x")
    assert out.returncode == 2 and "unknown encoder 'sd9'; registered:" in out.stderr
    out = run("encode", "--encoder", "tiny-sd15", "--weights", "/nonexistent/file.safetensors", "x")
    assert out.returncode == 2 and "no such file or folder" in out.stderr


def test_gc_of_a_path_that_is_no_store_says_so_and_leaves_nothing(tmp_path, capsys):
    """Bug: `clipcond gc missing_path` took the store lock first and failed with "No such file or directory:
    'missing_path/.clipcond.lock'"; on a folder of photos it left a lock file among them."""
    from clipcond.cli import main

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"\xff\xd8")
    for path in (tmp_path / "missing_path", photos):
        assert main(["gc", str(path)]) == 2
        err = capsys.readouterr().err
        assert f"clipcond gc: error: {path}: no manifest.json: not a clipcond embedding store" in err, err
    assert not (tmp_path / "missing_path").exists() and [p.name for p in photos.iterdir()] == ["a.jpg"]


def test_inspect_missing_path_says_it_does_not_exist(tmp_path, capsys):
    """Bug: `clipcond inspect missing_path` said "unknown weights file type ''" (the suffix of a path that is not
    there); it must say that the path does not exist, naming it, and exit non-zero."""
    from clipcond.cli import main

    missing = tmp_path / "missing_path"
    assert main(["inspect", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"clipcond inspect: error: {missing}: no such file or folder" in err and "file type" not in err
