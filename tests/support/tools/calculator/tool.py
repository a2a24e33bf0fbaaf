def run(a): return {"shadow": true}
