"""Airline database and tools: Skyline Air's reservations, flights, bags and changes (conversations in airline.py).

Database: one customer per conversation (tier regular, silver or gold) with 1-3 reservations, and
the flights on the routes involved (2-3 daily flights per route, each with cabin prices, seats
left and today's status).  Policy rules the tools enforce: cancellation only for business or
insured reservations, no flight changes on basic fares, bags $35 each (free for gold) up to 4 per
reservation.
"""

from __future__ import annotations

import random
import string
from typing import Any

from data.synthetic.retail_tools import FIRST_NAMES, LAST_NAMES
from data.synthetic.world import BOOLEAN, INTEGER, STRING, Db, Tool, ToolResult, enum, error, params, replace_record

AIRPORTS = ("BOS", "SEA", "JFK", "SFO", "ORD", "MIA", "DEN", "ATL", "LAX", "AUS")
CABINS = ("basic", "economy", "business")
BAG_FEE = 35
MAX_BAGS = 4
INSURANCE_FEE = 25


def random_date(rng: random.Random) -> str:
    return f"2025-{rng.randint(5, 9):02d}-{rng.randint(1, 28):02d}"


def _route_flights(rng: random.Random, origin: str, destination: str, used: set[str]) -> dict[str, dict[str, Any]]:
    """2-3 daily flights on one route with distinct ids and departure times."""
    flights = {}
    hours = sorted(rng.sample(range(6, 22), rng.randint(2, 3)))
    for hour in hours:
        flight_id = f"FL{rng.randint(100, 999)}"
        while flight_id in used:
            flight_id = f"FL{rng.randint(100, 999)}"
        used.add(flight_id)
        economy = rng.randrange(120, 400, 5)
        status = rng.choices(("on time", "delayed", "cancelled"), (7, 2, 1))[0]
        flights[flight_id] = {
            "flight_id": flight_id, "origin": origin, "destination": destination,
            "depart": f"{hour:02d}:{rng.choice(('00', '15', '30', '45'))}",
            "prices": {"basic": economy - 40, "economy": economy, "business": economy * 3},
            "seats": rng.randint(0, 9), "status": status,
            "delay_min": rng.choice((30, 45, 90, 120)) if status == "delayed" else 0,
        }
    return flights


def make_db(rng: random.Random) -> Db:
    """One customer with 1-3 reservations, plus the flights of their routes and of one more route."""
    first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
    customer_id = f"C{rng.randint(1000, 9999)}"
    used: set[str] = set()
    flights: dict[str, dict[str, Any]] = {}
    reservations: dict[str, dict[str, Any]] = {}
    for _ in range(rng.randint(1, 3) + 1):  # the extra route is for new bookings
        origin, destination = rng.sample(AIRPORTS, 2)
        flights.update(_route_flights(rng, origin, destination, used))
    routes = sorted({(flight["origin"], flight["destination"]) for flight in flights.values()})
    booked_routes = routes[:-1] if len(routes) > 1 else routes
    for origin, destination in booked_routes:
        flight = rng.choice([f for f in flights.values() if (f["origin"], f["destination"]) == (origin, destination)])
        reservation_id = "R" + "".join(rng.choices(string.ascii_uppercase + string.digits, k=4))
        cabin = rng.choices(CABINS, (3, 5, 2))[0]
        passengers = rng.randint(1, 3)
        insurance = rng.random() < 0.35
        price = flight["prices"][cabin]
        reservations[reservation_id] = {
            "reservation_id": reservation_id, "customer_id": customer_id, "flight_id": flight["flight_id"],
            "origin": origin, "destination": destination, "date": random_date(rng), "cabin": cabin,
            "passengers": passengers, "bags": rng.randint(0, 3), "insurance": insurance, "status": "booked",
            "seat_price": price, "paid": price * passengers + (INSURANCE_FEE * passengers if insurance else 0),
        }
    customer = {"customer_id": customer_id, "first_name": first, "last_name": last,
                "tier": rng.choices(("regular", "silver", "gold"), (5, 3, 2))[0], "reservations": list(reservations)}
    return {"customers": {customer_id: customer}, "reservations": reservations, "flights": flights}


# ----------------------------------------------------------------------------- tools


def verify_customer(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    customer = db["customers"].get(args["customer_id"])
    if customer is None or customer["last_name"].lower() != args["last_name"].strip().lower():
        return error("customer id and last name do not match"), db
    return {"customer_id": customer["customer_id"], "name": f"{customer['first_name']} {customer['last_name']}",
            "tier": customer["tier"]}, db


def get_customer(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    customer = db["customers"].get(args["customer_id"])
    if customer is None:
        return error(f"customer {args['customer_id']} not found"), db
    return {"customer_id": customer["customer_id"], "tier": customer["tier"],
            "reservations": list(customer["reservations"])}, db


RESERVATION_VIEW = ("reservation_id", "flight_id", "origin", "destination", "date", "cabin", "passengers", "bags",
                    "insurance", "status", "paid")


def get_reservation(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    reservation = db["reservations"].get(args["reservation_id"])
    if reservation is None:
        return error(f"reservation {args['reservation_id']} not found"), db
    return {key: reservation[key] for key in RESERVATION_VIEW}, db


def search_flights(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    cabin = args.get("cabin", "economy")
    found = [{"flight_id": flight["flight_id"], "depart": flight["depart"], "price": flight["prices"][cabin],
              "seats": flight["seats"]}
             for flight in sorted(db["flights"].values(), key=lambda flight: flight["depart"])
             if (flight["origin"], flight["destination"]) == (args["origin"], args["destination"])]
    return {"date": args["date"], "cabin": cabin, "flights": found}, db


def book_flight(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    flight = db["flights"].get(args["flight_id"])
    customer = db["customers"].get(args["customer_id"])
    if flight is None or customer is None:
        return error("unknown flight or customer"), db
    if flight["seats"] < args["passengers"]:
        return error(f"only {flight['seats']} seats left on {flight['flight_id']}"), db
    insurance = args.get("insurance", False)
    seat_price = flight["prices"][args["cabin"]]
    total = seat_price * args["passengers"] + (INSURANCE_FEE * args["passengers"] if insurance else 0)
    # The new id is derived from the booking itself so that replaying a conversation reproduces it.
    reservation_id = "R" + f"{abs(hash_text(args['flight_id'] + args['date'] + customer['customer_id'])):X}"[-4:]
    reservation = {
        "reservation_id": reservation_id, "customer_id": customer["customer_id"], "flight_id": flight["flight_id"],
        "origin": flight["origin"], "destination": flight["destination"], "date": args["date"],
        "cabin": args["cabin"], "passengers": args["passengers"], "bags": 0, "insurance": insurance,
        "status": "booked", "seat_price": seat_price, "paid": total,
    }
    db = replace_record(db, "reservations", reservation_id, reservation)
    db = replace_record(db, "flights", flight["flight_id"], {**flight, "seats": flight["seats"] - args["passengers"]})
    db = replace_record(db, "customers", customer["customer_id"],
                        {**customer, "reservations": customer["reservations"] + [reservation_id]})
    return {"reservation_id": reservation_id, "status": "booked", "total": total}, db


def hash_text(text: str) -> int:
    """A small stable string hash (Python's hash() is salted per process)."""
    value = 0
    for char in text:
        value = (value * 131 + ord(char)) % 1_000_003
    return value + 0x10000


def cancel_reservation(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    reservation = db["reservations"].get(args["reservation_id"])
    if reservation is None:
        return error(f"reservation {args['reservation_id']} not found"), db
    if reservation["status"] != "booked":
        return error(f"reservation {reservation['reservation_id']} is already {reservation['status']}"), db
    if not (reservation["insurance"] or reservation["cabin"] == "business"):
        return error("only business or insured reservations can be cancelled"), db
    updated = {**reservation, "status": "cancelled"}
    return ({"reservation_id": reservation["reservation_id"], "status": "cancelled", "refund": reservation["paid"]},
            replace_record(db, "reservations", reservation["reservation_id"], updated))


def change_flight(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    reservation = db["reservations"].get(args["reservation_id"])
    flight = db["flights"].get(args["flight_id"])
    if reservation is None or flight is None:
        return error("unknown reservation or flight"), db
    if reservation["cabin"] == "basic":
        return error("basic fares cannot change flights"), db
    if (flight["origin"], flight["destination"]) != (reservation["origin"], reservation["destination"]):
        return error("the new flight must fly the same route"), db
    if flight["seats"] < reservation["passengers"]:
        return error(f"only {flight['seats']} seats left on {flight['flight_id']}"), db
    seat_price = flight["prices"][reservation["cabin"]]
    difference = (seat_price - reservation["seat_price"]) * reservation["passengers"]
    updated = {**reservation, "flight_id": flight["flight_id"], "seat_price": seat_price,
               "paid": reservation["paid"] + difference}
    return ({"reservation_id": reservation["reservation_id"], "flight_id": flight["flight_id"],
             "fare_difference": difference},
            replace_record(db, "reservations", reservation["reservation_id"], updated))


def add_bags(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    reservation = db["reservations"].get(args["reservation_id"])
    if reservation is None:
        return error(f"reservation {args['reservation_id']} not found"), db
    total_bags = reservation["bags"] + args["bags"]
    if total_bags > MAX_BAGS:
        return error(f"at most {MAX_BAGS} bags per reservation"), db
    customer = db["customers"][reservation["customer_id"]]
    fee = 0 if customer["tier"] == "gold" else BAG_FEE * args["bags"]
    updated = {**reservation, "bags": total_bags, "paid": reservation["paid"] + fee}
    return ({"reservation_id": reservation["reservation_id"], "bags": total_bags, "fee": fee},
            replace_record(db, "reservations", reservation["reservation_id"], updated))


def flight_status(db: Db, args: dict[str, Any]) -> tuple[ToolResult, Db]:
    flight = db["flights"].get(args["flight_id"])
    if flight is None:
        return error(f"flight {args['flight_id']} not found"), db
    return {"flight_id": flight["flight_id"], "date": args["date"], "status": flight["status"],
            "delay_min": flight["delay_min"]}, db


TOOLS = (
    Tool("verify_customer", "Verify a customer.",
         params({"customer_id": STRING, "last_name": STRING}), verify_customer, auth_key="customer_id"),
    Tool("get_customer", "List a customer's reservations.", params({"customer_id": STRING}), get_customer),
    Tool("get_reservation", "Get a reservation.", params({"reservation_id": STRING}), get_reservation),
    Tool("search_flights", "Search flights.",
         params({"origin": STRING, "destination": STRING, "date": STRING}, {"cabin": enum(*CABINS)}),
         search_flights),
    Tool("book_flight", "Book a flight.",
         params({"customer_id": STRING, "flight_id": STRING, "date": STRING, "cabin": enum(*CABINS),
                 "passengers": INTEGER}, {"insurance": BOOLEAN}), book_flight, writes=True),
    Tool("cancel_reservation", "Cancel a reservation.", params({"reservation_id": STRING}), cancel_reservation,
         writes=True),
    Tool("change_flight", "Change a reservation's flight.",
         params({"reservation_id": STRING, "flight_id": STRING}), change_flight, writes=True),
    Tool("add_bags", "Add checked bags.", params({"reservation_id": STRING, "bags": INTEGER}),
         add_bags, writes=True),
    Tool("flight_status", "Get a flight's status on a date.", params({"flight_id": STRING, "date": STRING}),
         flight_status, public=True),
)
