"""Flower adapter: federated runs of a `kind: federated` spec.

`driver` runs them (`run_federated`); `client` is what a client does (plain PyTorch) and `client_app`
its Flower ClientApp; `server` the rounds and the record, `server_app` its Flower ServerApp;
`partition` divides the data among the clients; `strategies` builds Flower's strategy; `flower_run` submits
to a SuperLink with `flwr run` (`simulation` starts one for a simulation); `checkpoint` and `resume` are
`--resume`; `compare` runs a federated spec beside its centralized counterpart. Nothing is imported
here: a client process loads only what it uses.
"""
