"""Kill a child process while it is writing a checkpoint (for the atomic-save tests)."""

import os
import signal
import subprocess
import time
from pathlib import Path


def kill_mid_save(argv, env, directory, ready_line, temp_prefix, timeout=120):
    """Start ``argv``; once it prints ``ready_line`` (its first checkpoint is
    safe) and a temporary file named ``temp_prefix...`` with data in it appears
    in ``directory``, SIGKILL it. Returns the temporary file's path."""
    directory = Path(directory)
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    try:
        line = proc.stdout.readline()
        assert line.strip() == ready_line, proc.stderr.read()
        deadline = time.monotonic() + timeout
        tmp = None
        while tmp is None and time.monotonic() < deadline:
            for name in os.listdir(directory):
                if name.startswith(temp_prefix) and name.endswith(".tmp"):
                    try:
                        if (directory / name).stat().st_size > 0:  # data is being written
                            tmp = directory / name
                    except FileNotFoundError:
                        pass
            assert proc.poll() is None, "the save finished before it was killed"
            time.sleep(0.0005)
        assert tmp is not None, "the temporary file never appeared"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    return tmp
