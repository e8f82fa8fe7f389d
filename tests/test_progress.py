"""Progress and the quiet CLI's plumbing: a stage logs done/total and its ETA when no console is
there (a job under `ray job submit`), and `quiet` sends everything written to file descriptors 1
and 2, by Python or not, to the log file while `echo` still reaches the terminal."""

import logging
import subprocess
import sys

from vlsae_ray import progress


def test_a_stage_without_a_console_logs_its_progress(caplog, monkeypatch):
    monkeypatch.setattr(progress, "LOG_EVERY_S", 0.0)
    with caplog.at_level(logging.INFO, logger="vlsae_ray.progress"), progress.stage("label", 4, "shards"):
        progress.advance()
        with progress.stage("inner", 99, "rows"):  # a job inside a job: the outer stage stays in charge
            progress.advance(3)
    progress.advance()  # no stage open: nothing to move
    lines = [record.getMessage() for record in caplog.records]
    assert lines[0].startswith("label: 1/4 shards") and "ETA" in lines[0]
    assert lines[-1].startswith("label: 4/4 shards")


QUIET = """
import logging, os, sys
from vlsae_ray import progress
progress.quiet(sys.argv[1])
print("a library's print")
logging.basicConfig(level=logging.INFO)
logging.getLogger("ray").warning("a Ray warning")
os.write(2, b"a C extension's output\\n")
with progress.stage("train", 2, "steps"):
    progress.advance(2)
progress.echo("the result")
progress.echo("an error", error=True)
"""


def test_quiet_sends_every_log_to_the_file_and_results_to_the_terminal(tmp_path):
    log = tmp_path / "logs" / "run.log"
    run = subprocess.run([sys.executable, "-c", QUIET, str(log)], capture_output=True, timeout=60)
    stdout, stderr = run.stdout.decode(), run.stderr.decode()
    assert run.returncode == 0, stderr
    assert stdout.endswith("the result\n") and "train" in stdout and "2/2 steps" in stdout
    assert stderr == "an error\n"
    written = log.read_text()
    for line in ("a library's print", "a Ray warning", "a C extension's output"):
        assert line in written and line not in stdout + stderr
