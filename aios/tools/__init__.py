"""Tools shipped with AIOS, one folder each (tool.toml + code + data).

They live inside the package so that an installed wheel has them; a user's own tools go in
the top-level `tools/` folder of a checkout or any directory named in the tools options.
This package has no Python API: tool folders are found by the tool runtime, and their code
is imported by path in a worker process, never as `aios.tools.<name>`.
"""
