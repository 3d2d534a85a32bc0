"""Flower's stock FedAvg with every model update carried as a fibec codec payload.

payload.py is the part to copy into your own Flower app; task.py, client_app.py and server_app.py
are a minimal app around it. How to run it: server_app.py.
"""
