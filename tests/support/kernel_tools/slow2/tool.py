import os
import time


def run(args):
    started = time.monotonic()
    time.sleep(args["seconds"])
    return {"started": started, "ended": time.monotonic(), "pid": os.getpid()}
