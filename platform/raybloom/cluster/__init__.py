"""The local cluster (`raybloom cluster up|down|status`): ops only, no training code imports it.

`cli` is the command, `launch` starts the processes; see `cli` for what runs and where its state lives."""
