"""Container engines, behind one small synchronous contract.

Drivers are synchronous because the engines' SDKs are; the driver worker runs
them in threads. Every operation is idempotent, because the worker may repeat
it after a crash or a redelivery.
"""
