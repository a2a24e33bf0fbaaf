import os


def run(args):
    os._exit(args.get("status", 3))
