"""Resumable state for long loops, below the model and method layers: the checkpoint store
(`dpsel.resume.checkpoints`). The run (`dpsel.curation`) creates the store and hands it to the layers below
through a context variable (`checkpoints.active`); they read it with `current()`, never import the run."""
