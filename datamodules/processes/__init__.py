"""Process lifecycle: the processes a training run starts besides its own, and how it exits.

- :mod:`.workers`: DataLoader worker processes (start method, job signals, ending them at exit);
- :mod:`.exit_hooks`: interpreter-exit hooks of a training process (deaf children, gloo's threads);
- :mod:`.forkserver_preload`: what the forkserver that starts workers imports once.

Not data code: the data backends use it, and nothing here reads an image.
"""
