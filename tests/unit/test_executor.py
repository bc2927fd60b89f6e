"""The Dask executor's bound on shards in flight (pipeline/executor.py)."""

from __future__ import annotations


def test_the_bound_follows_the_cluster_but_is_asked_for_at_most_every_refresh():
    # Asked at every finished shard, the scheduler's whole worker list would be sent each time;
    # cached for `bound_refresh_s`, a worker that joins is seen at the next ask.
    from distributed import Client, LocalCluster

    from curate.pipeline.executor import DaskExecutor

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        executor = DaskExecutor(client, shards_per_slot=2, bound_refresh_s=3600)
        assert executor.bound == 2  # one slot
        cluster.scale(2)
        client.wait_for_workers(2, timeout=30)
        assert executor.bound == 2  # not asked again within the refresh interval
        executor.bound_refresh_s = 0
        assert executor.bound == 4  # asked again: two slots
