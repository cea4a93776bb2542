"""Running one recipe on several processes (torchrun): the process group (``world``), DDP and FSDP2
(``parallel``) and sharded checkpoints (``checkpoint``)."""
