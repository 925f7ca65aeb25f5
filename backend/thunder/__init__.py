"""Thunder Train: MLX LoRA adapter runs across two Macs joined by Thunderbolt (MLX ring
backend), with a preflight, live metrics in state.db and a no-progress watchdog.

config.py    cluster TOML (hosts, paths, the safe training shape)
hosts.py     run a command on a host (ssh, or locally for tests)
preflight.py checks before a launch, as a pass/fail table
launch.py    hostfile + ``mlx.launch --backend ring``; resume; stop
worker.py    the rank entry point (mlx-lm LoRA training, JSON-lines metrics)
monitor.py   metrics into state.db, watchdog, failure classification, artifacts, AGP eval
agp_eval.py  the AGP evaluation of a trained adapter on the held-out corpus split
cli.py       ``nko-ops thunder preflight|launch|monitor|status|stop``
"""
