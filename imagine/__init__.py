"""The job contract, the queue and the client every front end shares. Imports no torch."""
