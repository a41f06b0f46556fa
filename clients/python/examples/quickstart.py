"""Quick start: connect, publish, read a channel, broadcast, history and presence.

    python examples/quickstart.py [ws://localhost:8080/] [chat:lobby]

Runs against a Switchboard server (``cargo run`` serves one on port 8080) and ends
once it has read back its own publication.
"""

from __future__ import annotations

import asyncio
import sys

from switchboard_client import Client, RecoveryFailed


async def main(url: str, channel: str) -> None:
    async with Client(url) as client:  # returns once the server's welcome arrived
        print("I am", client.client_id)
        client.on("broadcast", lambda frame: print("broadcast from", frame["senderId"], frame["data"]))

        sub = await client.subscribe(channel)
        offset = await client.publish(channel, {"text": "hi"})
        print("published at offset", offset)
        await client.broadcast({"text": "hi all"})  # every other client gets it

        history = await client.history(channel, limit=10)
        print("history:", [(p.offset, p.data) for p in history.publications])
        presence = await client.presence(channel)
        print("present:", [m.client_id for m in presence.members])

        while True:
            try:
                async for msg in sub:  # reconnects and recovers by itself
                    print(f"{msg.channel} #{msg.offset} from {msg.sender_id}: {msg.data}")
                    if msg.offset == offset:
                        return
            except RecoveryFailed as gap:  # the server could not fill a gap: say so
                print("missed some publications:", gap)
                recent = await client.history(channel, limit=10)
                print("what is still retained:", [(p.offset, p.data) for p in recent.publications])


if __name__ == "__main__":
    args = sys.argv[1:]
    asyncio.run(main(args[0] if args else "ws://localhost:8080/", args[1] if len(args) > 1 else "chat:lobby"))
