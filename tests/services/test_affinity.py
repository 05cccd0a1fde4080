"""Session-affine replica choice in the gateway (services/gateway/stages.py): rendezvous hashing
of the session id over the replica addresses. Pure functions, no sockets."""
import asyncio
from collections import Counter

from michi.serving.launcher import free_port
from services.gateway.stages import Channels, StageLink, rendezvous_order, rendezvous_score, resolve

REPLICAS = [f"10.0.0.{i}:50062" for i in range(1, 5)]
SESSIONS = [f"session-{i}" for i in range(2000)]


def first(session, addresses):
    return rendezvous_order(session, addresses)[0]


def test_order_is_a_stable_permutation():
    for s in SESSIONS[:50]:
        order = rendezvous_order(s, REPLICAS)
        assert sorted(order) == sorted(REPLICAS)
        assert order == rendezvous_order(s, list(reversed(REPLICAS)))  # the list's order does not matter
    assert rendezvous_order("a", REPLICAS + REPLICAS[:1]) == rendezvous_order("a", REPLICAS)  # duplicates dropped
    assert rendezvous_order("a", []) == []


def test_known_values_do_not_drift():
    # The same session lands on the same replica from any gateway, any process, any release: a
    # change of hash (or of its input's layout) would move every live call during a rolling update.
    # These literals were computed once with rendezvous_order / rendezvous_score as they are in
    # services/gateway/stages.py (blake2b, 8-byte digest of "address\0session", big-endian, issue 14);
    # they are expected values, never recompute them from the code under test.
    assert rendezvous_score("call-42", "a:1") == 5097091667218933195
    assert rendezvous_score("call-42", "b:1") == 1574131700808095914
    assert rendezvous_order("call-42", ["a:1", "b:1", "c:1"]) == ["a:1", "c:1", "b:1"]
    assert rendezvous_order("call-42", ["c:1", "b:1", "a:1"]) == ["a:1", "c:1", "b:1"]
    assert rendezvous_order("s-1", REPLICAS) == ["10.0.0.4:50062", "10.0.0.2:50062", "10.0.0.3:50062", "10.0.0.1:50062"]
    assert rendezvous_order("session-0", REPLICAS) == ["10.0.0.4:50062", "10.0.0.1:50062", "10.0.0.3:50062",
                                                       "10.0.0.2:50062"]
    assert rendezvous_order("", ["a:1", "b:1"]) == ["b:1", "a:1"]
    assert rendezvous_order("call-42", ["only:1"]) == ["only:1"]


def test_calls_spread_evenly():
    counts = Counter(first(s, REPLICAS) for s in SESSIONS)
    assert set(counts) == set(REPLICAS)
    assert max(counts.values()) < 1.25 * len(SESSIONS) / len(REPLICAS)


def test_removing_a_replica_moves_only_its_calls_to_their_second_choice():
    dead = REPLICAS[2]
    alive = [a for a in REPLICAS if a != dead]
    for s in SESSIONS:
        before = rendezvous_order(s, REPLICAS)
        after = first(s, alive)
        if before[0] != dead:
            assert after == before[0]  # untouched
        else:
            assert after == before[1]  # failover target == where every gateway now puts it


def test_adding_a_replica_moves_about_one_in_n():
    grown = REPLICAS + ["10.0.0.9:50062"]
    moved = [s for s in SESSIONS if first(s, grown) != first(s, REPLICAS)]
    assert all(first(s, grown) == "10.0.0.9:50062" for s in moved)
    assert 0.1 < len(moved) / len(SESSIONS) < 0.3  # ~1/5


def test_failed_replicas_are_tried_last():
    link = StageLink("backbone", REPLICAS, FakeChannels(), method=None, opener=None, session_id="s-1")
    order = asyncio.run(link.candidates())
    assert order == rendezvous_order("s-1", REPLICAS)
    link.failed.add(order[0])
    again = asyncio.run(link.candidates())
    assert again == order[1:] + order[:1]


def test_replicas_whose_health_says_not_serving_are_tried_last():
    channels = FakeChannels()
    link = StageLink("backbone", REPLICAS, channels, method=None, opener=None, session_id="s-1")
    order = rendezvous_order("s-1", REPLICAS)
    channels.down = {order[0], order[2]}  # e.g. wedged: their watchdog says NOT_SERVING
    assert asyncio.run(link.candidates()) == [order[1], *order[3:], order[0], order[2]]


def test_health_of_a_replica_that_does_not_answer_is_not_serving():
    async def ask():
        channels = Channels()
        try:
            return await channels.serving(f"127.0.0.1:{free_port()}"), channels.health
        finally:
            await channels.close()

    ok, cache = asyncio.run(ask())
    assert ok is False and len(cache) == 1  # remembered for HEALTH_TTL_S


def test_dns_addresses_expand_and_static_ones_stay(monkeypatch):
    cache = {}
    out = asyncio.run(resolve(["127.0.0.1:1", "dns:///localhost:50062"], cache))
    assert out[0] == "127.0.0.1:1"
    assert any(a in ("127.0.0.1:50062", "[::1]:50062") for a in out[1:])
    assert "dns:///localhost:50062" in cache

    async def fails(*args, **kwargs):  # no real DNS lookup: a sandbox without network may hang on one
        raise OSError("Name or service not known")

    monkeypatch.setattr(asyncio.BaseEventLoop, "getaddrinfo", fails)
    # a name that does not resolve is kept (its stream then fails over like a dead replica) ...
    assert asyncio.run(resolve(["dns:///michi-backbone-headless:7"])) == ["michi-backbone-headless:7"]
    # ... and a cached answer is reused for DNS_TTL_S, without asking again
    assert asyncio.run(resolve(["dns:///localhost:50062"], cache)) == out[1:]


class FakeChannels:
    """Channels without sockets: REPLICAS are made-up addresses, never to be dialled."""

    def __init__(self):
        self.dns = {}
        self.down: set[str] = set()

    def get(self, address):
        return address

    async def serving(self, address):
        return address not in self.down


class FakeCall:
    def __init__(self, address):
        self.address = address

    def cancel(self):
        pass

def test_open_fails_over_down_the_ranking():
    dead = set()
    opened = []

    async def opener(link, rebuild):
        if link.call.address in dead:
            raise ConnectionError("replica down")
        opened.append((link.call.address, rebuild))

    def link():
        return StageLink("vocoder", REPLICAS, FakeChannels(), lambda ch: (lambda wait_for_ready: FakeCall(ch)),
                         opener, session_id="s-7")

    order = rendezvous_order("s-7", REPLICAS)
    first_link = link()
    asyncio.run(first_link.open())
    assert first_link.address == order[0] and opened[-1] == (order[0], False)

    dead.add(order[0])  # the preferred replica is down: the next in the ranking, told to rebuild
    second = link()
    asyncio.run(second.open())
    assert second.address == order[1] and opened[-1] == (order[1], True)
    assert second.failed == {order[0]}
