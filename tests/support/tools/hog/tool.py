def run(args):
    block = bytearray(args["mb"] << 20)
    return {"allocated_mb": len(block) >> 20}
