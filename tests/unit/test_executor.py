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


def _double(x):
    return 2 * x


def _plus_one(x):
    return x + 1


def test_chains_are_sent_several_to_a_call_and_every_shard_comes_back():
    # The scheduler keeps metadata per call, so new shards go out together once half the bound is
    # free; each shard still comes back with its own results, and in flight never passes the bound.
    from distributed import Client, LocalCluster

    from curate.pipeline.executor import UPSTREAM, DaskExecutor, Task

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        executor = DaskExecutor(client, shards_per_slot=4, bound_refresh_s=3600)
        chains = ((shard, [Task("a", _double, (shard,)), Task("b", _plus_one, (UPSTREAM,))]) for shard in range(40))
        outcomes = {o.shard: o for o in executor.run_chains("test", chains)}
    assert sorted(outcomes) == list(range(40))
    assert all(o.ok and o.results == {"a": 2 * s, "b": 2 * s + 1} for s, o in outcomes.items())
    assert executor.peak_in_flight <= executor.bound == 4
    assert executor.calls <= 40 // 2 + 1  # two shards a call at least (half the bound), not one
