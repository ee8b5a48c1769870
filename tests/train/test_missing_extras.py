"""A core-only install (``pip install -e .``): each command that needs an extra says which, in one line.

One interpreter runs every case (a start-up of torch each would cost seconds): a meta-path finder makes the named
package uninstallable, the xent modules that imported it are forgotten, and ``xent.cli.main`` runs the command.
"""

import json
import subprocess
import sys

SCRIPT = r"""
import contextlib, io, json, sys

class Missing:
    names = set()

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None

sys.meta_path.insert(0, Missing())
results = []
for package, argv in json.loads(sys.argv[1]):
    Missing.names = {package}
    for name in [n for n in sys.modules if n.split(".")[0] == package or n.startswith(("xent.train", "xent.bench"))]:
        del sys.modules[name]
    from xent.cli import main

    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as exit:
            status = exit.code
        except BaseException as error:  # what the user would see as a traceback
            status, _ = "raised", stderr.write(f"Traceback: {type(error).__name__}: {error}")
    results.append([status, stderr.getvalue()])
print(json.dumps(results))
"""


def test_a_command_whose_extra_is_missing_names_the_extra_in_one_line(tmp_path):
    quick = ["--out", str(tmp_path / "run"), "--epochs", "1", "--quiet"]
    cases = [
        ("matplotlib", ["train", *quick], "matplotlib", "xent[train]"),  # before training, not after it
        ("torchmetrics", ["train", *quick], "torchmetrics", "xent[train]"),  # imported lazily, found up front
        ("torchmetrics", ["eval", str(tmp_path / "run")], "torchmetrics", "xent[train]"),
        ("sklearn", ["train", *quick], "sklearn", "xent[train]"),
        ("kornia", ["train", *quick, "--augment", "flip"], "kornia", "xent[train]"),
        ("rich", ["compare", "--out", str(tmp_path / "study"), "--seeds", "1"], "rich", "xent[train]"),
        ("rich", ["bench", "ce", "--n", "8", "--v", "16"], "rich", "xent[bench]"),
    ]
    process = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps([[package, argv] for package, argv, _, _ in cases])],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert process.returncode == 0, process.stderr[-3000:]
    results = json.loads(process.stdout.strip().splitlines()[-1])
    for (_, argv, package, extra), (status, stderr) in zip(cases, results, strict=True):
        lines = stderr.strip().splitlines()
        assert status == 2 and len(lines) == 1, (argv, status, stderr)
        assert "Traceback" not in stderr
        assert lines[0].startswith(f"xent {argv[0]}: error: ") and package in lines[0], lines[0]
        assert f'pip install "{extra}"' in lines[0], lines[0]
