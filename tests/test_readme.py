"""README's two set-up commands are the ones CI and users run."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _commands():
    return re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_ci_runs_exactly_the_readme_test_command():
    test_command = next(c for c in _commands() if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text().splitlines()


def test_readme_main_job_runs_compare_on_the_default():
    main_job = next(c for c in _commands() if "coopsgd compare" in c)
    assert main_job.endswith("coopsgd compare")  # no arguments: the embedded default


def test_readme_python_example_runs(capsys):
    code = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)[0]
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    first = capsys.readouterr().out.splitlines()[0]
    assert first == "Algorithm(dpsgd: tau=1, W=8x8 symmetric, v=0, m=8, zeta=0.8047)"
