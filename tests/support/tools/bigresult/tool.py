def run(args):
    return {"data": "x" * args["bytes"]}
