"""The broker link (aio-pika) and every use of aiormq/pamqp internals."""
