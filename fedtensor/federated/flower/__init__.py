"""The restoration model's federated training on real machines, as a Flower (``flwr``) app.

* :mod:`.task` — what server and clients share: parameters ⇄ NDArrays / ``ArrayRecord`` (every array
  at least 1-d), the run settings read from Flower's run config, each node's data, and the local update
  (the nn trainer's jitted step, ``lax.scan``-ned over the round's pre-sampled patch batches).
* :mod:`.client_app` — the ``ClientApp`` (one per hospital, run by its SuperNode).
* :mod:`.server_app` — the ``ServerApp`` (run by the SuperLink): FedAvg of the clients' weighted
  deltas, by Flower's SecAgg+ by default, and every global version written atomically and published.

The Flower project that names these components is ``examples/federation``; ``docs/federation.md``
explains how to start a SuperLink and SuperNodes on several machines. Requires the ``fed`` extra.
"""
