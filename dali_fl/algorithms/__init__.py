"""One file per algorithm, each with its Params, options, hooks, state and refusals."""
