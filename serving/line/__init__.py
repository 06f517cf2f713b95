"""The line: inspecting boards at the line with the champion and publishing each result to the MES."""
