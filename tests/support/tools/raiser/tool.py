def run(args):
    raise ValueError("the raiser tool always fails")
