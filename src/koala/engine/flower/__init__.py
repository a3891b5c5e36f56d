"""The Flower engines: the only place koala-fl imports `flwr`.

`server_app.app` and `client_app.app` are the deployment components (see flower-app/pyproject.toml);
`simulation.run_flower_simulation` runs a config on Flower's simulation engine.
"""
