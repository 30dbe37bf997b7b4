"""Running a standalone command's main() in-process, as a user would from the shell, and checking that the
files the user had are byte for byte as they were."""

import hashlib
import os


def snapshot(folder) -> dict:
    """Every file under folder -> the hash of its bytes."""
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, folder)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def run(main, argv, capsys) -> tuple:
    """(exit code, stderr) of a command's main; argparse's own refusals exit 2 with their message too."""
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err
