"""Fork `children` processes that each allocate (and touch) `mb` MB, wait until all hold it, keep them
`hold_s` seconds, then end them and report. Each process stays under the tool's memory_mb (its RLIMIT_AS);
only the sum passes it."""
import os
import signal
import time


def run(args):
    ready_r, ready_w = os.pipe()
    pids = []
    for _ in range(args["children"]):
        pid = os.fork()
        if pid == 0:
            os.close(ready_r)
            block = bytearray(args["mb"] << 20)
            for i in range(0, len(block), 4096):
                block[i] = 1
            os.write(ready_w, b".")
            while True:
                time.sleep(3600)
        pids.append(pid)
    os.close(ready_w)
    got = 0
    while got < len(pids):
        chunk = os.read(ready_r, 64)
        if not chunk:
            break
        got += len(chunk)
    time.sleep(args["hold_s"])
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"children": len(pids), "held_mb": got * args["mb"]}
