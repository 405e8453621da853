"""speechcast's benchmarks: each module measures one speed target against a baseline
measured in the same run and prints a table. Never part of `make test`; `make bench`
(`python -m bench`) runs them all, `python -m bench fanout` just one."""
