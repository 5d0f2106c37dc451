"""Local mode (`caffeserve up`) and the demo (`caffeserve demo`): a CaffeModelService manifest run
on this machine, no cluster. The top of the programs: it reads the manifest with the operator's
types (models.py), runs inference servers and a gateway (replicas.py), and has the command line
(main.py) and the demo built on it (demo.py).
"""
