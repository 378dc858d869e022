"""Scale-out over a Ray Serve pool: :mod:`.pool` (the Serve application, ``rtvamp pool``) and
:mod:`.backend` (``RayBackend``, the engine's side). Importing this package imports no Ray;
:mod:`.pool` and the DeploymentHandle transport do (the ``cluster`` extra)."""
