"""Running one recipe on several processes (torchrun).

- ``world``: the process group, its rank and device, and the small collectives ranks agree through.
- ``parallel``: DDP or FSDP2 around the model (the recipe's ``strategy``), each rank's rows of a batch.
- ``checkpoint``: sharded training snapshots (torch.distributed.checkpoint), resharded on load.
"""
