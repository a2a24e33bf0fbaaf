def run(a, ctx): return 1
