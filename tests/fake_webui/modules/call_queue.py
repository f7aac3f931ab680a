"""modules.call_queue: the queue lock every GPU job takes (A1111's FIFOLock is not reentrant)."""
import threading

queue_lock = threading.Lock()
