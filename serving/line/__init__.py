"""At the line: ``defectops line serve`` inspects boards with the registry's ``champion`` and carries each result to the
manufacturing execution system (MQTT, IPC-CFX, webhooks), raises systematic-defect alarms, and takes the repair
station's verdicts back as the next training labels (``docs/line.md``)."""
