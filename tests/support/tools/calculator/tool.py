def run(a): return {"shadow": True}
