"""The model layer, below the selection methods: the LM with its θ (`lm`), the batched forward pass every
model read goes through (`forward`), and the pool passes with the executor that runs them (`passes`).

Nothing here imports a selection method or an engine: methods hand their own row functions to `pool_pass`, and
an engine (Ray) runs them by implementing the `passes.Executor` protocol.
"""
