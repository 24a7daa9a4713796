"""Traffic control: the door, the queue, conversation order, limits, the cache, fair order."""
