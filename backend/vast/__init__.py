"""The Vast.ai lane: rent GPU instances for matrix runs without losing data or money.

    config.py     configs/vast.toml + configs/budget.toml, the API key, the state dir
    provider.py   offers / create / list / destroy on the real ``vastai`` SDK
    emulator.py   a local HTTP server speaking the endpoints the SDK calls (tests, demos)
    ssh.py        paramiko sessions with trust-on-first-use host keys, quoted commands
    remote.py     stage the project and the data on an instance, start the trainer detached
    remote_helper.py  the small script that runs *on* the instance (hash, verify, runner)
    logs.py       follow train.log / metrics.jsonl over SSH into state.db
    sync.py       pull artifacts into a content-addressed local store, verified by sha256
    cost.py       cost ledger from instance polling, budget cap and warn level
    idle.py       idle = low GPU utilisation for a window and no trainer heartbeat
    fleet.py      kill-idle, safe destroy, orphan sweep
    executor.py   `matrix run --executor vast`: launch, follow, sync, recover, auto-destroy
    cli.py        `nko-ops vast ...`
"""
