def run(a): return 1
