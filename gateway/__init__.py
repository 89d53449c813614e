"""birdgen's HTTP gateway: the REST API, the web page and the batch jobs in front of the client library."""
