"""Scale-out on Ray Serve: engine replicas with adapter affinity behind the one OpenAI endpoint.

Deployments (see :mod:`.app`, started by ``adapter-server --ray --replicas N``):

* ``EngineReplica`` (:mod:`.replica`), N replicas: each hosts one :class:`~server.engine.engine.Engine`
  built from the same ``EngineConfig`` and streams its ``RequestOutput`` objects back. Adapter
  versions (``name@sha256-prefix``) are Ray Serve multiplexed models, at most
  ``--max-adapter-slots`` per replica, so an adapter's requests go to the replica that holds it.
* ``Ingress`` (:mod:`.app`): the same FastAPI app as the single server (``create_app``) over a
  :class:`~.client.RayEngineClient`, which keeps the engine contract (tokenizer, ``make_request``,
  ``stream``, the adapter store, ...) and forwards ``stream`` to the replicas through a
  ``DeploymentHandle`` with ``multiplexed_model_id`` set to the request's adapter version.

Every replica and the ingress open the same adapter store directory (``--adapter-dir``); its index
is the commit point, read on every request, so an upload or a delete through the ingress is seen
by every replica at once. Nothing here is imported by the single server; ``ray`` is the optional
extra ``[ray]``.
"""
