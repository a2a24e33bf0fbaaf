import time


def run(args):
    started = time.monotonic()
    if args["seconds"]:
        time.sleep(args["seconds"])
    return {"started": started, "ended": time.monotonic()}
